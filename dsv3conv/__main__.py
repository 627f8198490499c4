from dsv3conv.cli import main

main()
