"""Fleet over MQTT: registry, service, aggregation, embedded broker, fleet commands."""
