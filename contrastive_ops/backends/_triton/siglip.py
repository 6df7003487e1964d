SIGLIP = None
