from etokit.cli import main

main()
