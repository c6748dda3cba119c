from podsweep_cli.app import main

main()
