//! The meshward signer library.
