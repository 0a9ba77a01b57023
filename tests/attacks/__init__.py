"""
The attack suite: each test plays a hostile party against a real relay process on loopback
and checks that the relay's bounds hold — its memory and descriptors stay bounded, the
attacker gets a clear refusal, and a legitimate client gets through during and after.
"""
