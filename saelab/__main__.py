from saelab.cli.app import main

main()
