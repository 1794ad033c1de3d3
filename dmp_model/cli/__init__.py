"""The ``dmp`` command: ``dmp predict`` on images and videos (other packages add commands)."""
