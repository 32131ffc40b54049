from gssf_cli.app import main

main()
