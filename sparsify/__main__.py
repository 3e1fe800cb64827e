from sparsify.cli import main

main()
