from personaedit.cli import main

main()
