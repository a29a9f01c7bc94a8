from engine.kafka.shard import main

raise SystemExit(main())
