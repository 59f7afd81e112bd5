"""framecast.cluster — the control plane: the `framecast` CLI, the embedded local stack
(Apache Kafka broker + Ray head), Ray job submission and cluster configs."""
