from podsweep.cli import main

main()
