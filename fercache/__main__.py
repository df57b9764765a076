from fercache.cli import main

main()
