from gssf_cli.cli.app import main

main()
