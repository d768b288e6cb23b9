from containerfs.cli import main

raise SystemExit(main())
