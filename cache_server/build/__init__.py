"""The build room: options, teacher loading, data sources, target computation, the crash-safe writer."""
