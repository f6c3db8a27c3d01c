from osqueue.cli import main

main()
