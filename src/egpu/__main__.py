from egpu.cli import main

main()
