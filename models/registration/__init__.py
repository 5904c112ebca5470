"""Registration engines behind one interface (see ``models.registration.base``)."""
