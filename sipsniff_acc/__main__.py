from sipsniff_acc.cli import main

main()
