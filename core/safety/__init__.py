"""Safety: risk screening of user turns, crisis resources, safety cases and reply screening."""
