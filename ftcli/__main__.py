from ftcli.cli import main

main()
