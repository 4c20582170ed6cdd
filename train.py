from vit.cli import main

main()
