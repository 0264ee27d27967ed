from microvm.cli.entry import main

main()
