"""One module per source kind (`SourceConfig.kind`), each with `open_source(config) -> TrafficSource`."""
