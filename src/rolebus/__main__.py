from rolebus.cli.main import main

main()
