"""The orchestration of the stages: content-hashed stages (`stages`) and `sepp pipeline`."""
