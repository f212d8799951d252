from django.dispatch import Signal

# Sent after the transaction that revoked a key commits; the gateway drops it from its caches
# (and tells its other processes) so the key stops working everywhere within a second.
# Arguments: api_key_id, prefix.
api_key_revoked = Signal()
