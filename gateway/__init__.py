"""The gateway: validates requests, publishes them to RabbitMQ and answers with the worker's outcome."""
