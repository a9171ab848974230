"""The commands floor: one short program per `chatsft` command, on the pipeline library and the training
floor. Commands never import each other; what two of them share lives on a floor below."""
