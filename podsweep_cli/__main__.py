from podsweep_cli.entry import main

main()
