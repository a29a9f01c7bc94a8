from shards.shard import main

raise SystemExit(main())
