//! Sets of backends already met, inline for the usual few and on the heap only for long
//! walks: `Seen`, what a Maglev preference walk has yielded, and `Tried`, what one
//! connection's selector has handed out. Both keep the hot path free of allocation.

/// Backends already yielded by a walk. Callers usually stop after one or two candidates,
/// so a walk only allocates once it has yielded more than [`Seen::INLINE`] backends of a
/// set larger than 64.
#[derive(Debug, Clone)]
pub(crate) enum Seen {
    Bits(u64),
    Few {
        ids: [u32; Seen::INLINE],
        len: usize,
    },
    Heap(Vec<u64>),
}

impl Seen {
    const INLINE: usize = 16;

    #[inline]
    pub(crate) fn for_backends(count: usize) -> Seen {
        if count <= 64 {
            Seen::Bits(0)
        } else {
            Seen::Few {
                ids: [0; Seen::INLINE],
                len: 0,
            }
        }
    }

    /// Records `backend`; false if it was already recorded.
    #[inline]
    pub(crate) fn insert(&mut self, backend: usize) -> bool {
        match self {
            Seen::Bits(bits) => {
                let bit = 1u64 << backend;
                let new = *bits & bit == 0;
                *bits |= bit;
                new
            }
            Seen::Few { ids, len } => {
                // Backends < u32::MAX, as checked by `build`.
                let id = backend as u32;
                if ids[..*len].contains(&id) {
                    return false;
                }
                if *len < Seen::INLINE {
                    ids[*len] = id;
                    *len += 1;
                    return true;
                }
                let mut words = vec![0u64; backend.max(max_id(ids)) / 64 + 1];
                for &old in ids.iter() {
                    set_bit(&mut words, old as usize);
                }
                set_bit(&mut words, backend);
                *self = Seen::Heap(words);
                true
            }
            Seen::Heap(words) => {
                let word = backend / 64;
                if word >= words.len() {
                    words.resize(word + 1, 0);
                }
                let new = words[word] & (1 << (backend % 64)) == 0;
                set_bit(words, backend);
                new
            }
        }
    }
}

fn max_id(ids: &[u32]) -> usize {
    ids.iter().copied().max().unwrap_or(0) as usize
}

fn set_bit(words: &mut [u64], bit: usize) {
    words[bit / 64] |= 1 << (bit % 64);
}

/// The backends one connection has tried: inline for the usual few attempts, so a
/// selection allocates nothing unless a client walks past [`Tried::INLINE`] backends.
#[derive(Debug, Default)]
pub(crate) struct Tried {
    inline: [usize; Tried::INLINE],
    len: usize,
    more: Vec<usize>,
}

impl Tried {
    /// `connect_retries` defaults to 2: three attempts fit with room to spare.
    const INLINE: usize = 4;

    #[inline]
    pub(crate) fn push(&mut self, id: usize) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = id,
            None => self.more.push(id),
        }
        self.len += 1;
    }

    #[inline]
    pub(crate) fn contains(&self, id: usize) -> bool {
        self.inline[..self.len.min(Tried::INLINE)].contains(&id) || self.more.contains(&id)
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}
