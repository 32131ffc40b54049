"""What runs on Ray, the only package that imports it: session and address checks, tune trials, Ray Train workers."""
