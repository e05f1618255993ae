"""Edge-client side of fedpeft: local PEFT training and the Flower ClientApp."""
