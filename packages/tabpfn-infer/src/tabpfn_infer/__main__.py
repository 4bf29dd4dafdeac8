from tabpfn_infer.cli import main

raise SystemExit(main())
