from router.router import main

raise SystemExit(main())
