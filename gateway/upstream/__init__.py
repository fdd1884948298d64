"""The gateway's side of the encoder and decoder services: clients, replica pools, media fetch."""
