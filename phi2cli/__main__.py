from phi2cli.cli import main

main()
