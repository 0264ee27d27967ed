from microvm.cli.commands import main

main()
