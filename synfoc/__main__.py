from synfoc.cli import main

raise SystemExit(main())
