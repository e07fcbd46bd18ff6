"""flashsale: a Kafka event-sourced flash-sale backend."""
