from microvm.shim.manager import main

main()
