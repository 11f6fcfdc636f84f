"""What a hospital's IT runs around the ClientApp: `pmfl site` commands, the site directory, the
SuperNode launcher, and the gate that runs only approved apps. Not part of the study app itself."""
