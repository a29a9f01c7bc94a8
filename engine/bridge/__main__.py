from engine.kafka.bridge import main

raise SystemExit(main())
