"""The aiohttp side: the application, pages, login, dashboard, the admin socket and HTTP hardening."""
