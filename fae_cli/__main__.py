from fae_cli.cli.app import main

main()
