from rolebus.cli import main

main()
