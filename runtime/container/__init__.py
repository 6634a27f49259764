"""What runs inside the container: PID 1, its services, the interceptor."""
