//! A session's replay ring, sharing storage with its channel.
//!
//! Every member of a channel receives the same events in the same order, so
//! a ring of one pointer per dispatch per session (8 KiB for 1,024 held)
//! would mostly hold copies of the same pointers. Instead the hub appends
//! each channel event to the channel's [`Log`]: blocks of [`BLOCK`] slots,
//! filled once and then only read. A session's [`Ring`] holds *runs*, a
//! block and a range of its slots; each event delivered in order extends
//! the last run, so a member of a busy channel holds one 16-byte entry per
//! [`BLOCK`] dispatches. Dispatches for one session only (a CHANNEL_MOVE
//! snapshot, an event handed over on attach) are single entries. A block
//! lives as long as the channel or a ring still points into it.

use crate::wire::Dispatch;
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

/// Slots per block.
pub const BLOCK: usize = 32;

/// A block of a channel's log: slots filled in order, each once.
pub struct Block {
    slots: [OnceLock<Arc<Dispatch>>; BLOCK],
}

impl Block {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            slots: std::array::from_fn(|_| OnceLock::new()),
        })
    }

    fn get(&self, i: u8) -> &Arc<Dispatch> {
        self.slots[i as usize]
            .get()
            .expect("a slot is filled before any ring points at it")
    }
}

/// The hub's side: where a channel appends its delivered events.
pub struct Log {
    block: Arc<Block>,
    fill: usize,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            block: Block::new(),
            fill: 0,
        }
    }
}

impl Log {
    /// Appends `dispatch`; returns its block and slot, for
    /// [`Ring::push_shared`].
    pub fn append(&mut self, dispatch: Arc<Dispatch>) -> (&Arc<Block>, u8) {
        if self.fill == BLOCK {
            self.block = Block::new();
            self.fill = 0;
        }
        let slot = self.fill;
        if self.block.slots[slot].set(dispatch).is_err() {
            unreachable!("slots are filled in order, once");
        }
        self.fill += 1;
        (&self.block, slot as u8)
    }
}

enum Entry {
    One(Arc<Dispatch>),
    /// Slots `start..start + len` of a block.
    Run(Arc<Block>, u8, u8),
}

impl Entry {
    fn len(&self) -> usize {
        match self {
            Entry::One(_) => 1,
            Entry::Run(_, _, len) => *len as usize,
        }
    }
}

/// A session's dispatches, oldest first.
#[derive(Default)]
pub struct Ring {
    entries: VecDeque<Entry>,
    len: usize,
}

impl Ring {
    /// Dispatches held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The newest dispatch.
    pub fn last(&self) -> Option<&Arc<Dispatch>> {
        match self.entries.back()? {
            Entry::One(d) => Some(d),
            Entry::Run(block, start, len) => Some(block.get(*start + *len - 1)),
        }
    }

    pub fn push(&mut self, dispatch: Arc<Dispatch>) {
        self.entries.push_back(Entry::One(dispatch));
        self.len += 1;
    }

    /// Appends slot `slot` of `block` (filled).
    ///
    /// Hot path: extending the last run touches no reference count.
    pub fn push_shared(&mut self, block: &Arc<Block>, slot: u8) {
        if let Some(Entry::Run(last, start, len)) = self.entries.back_mut() {
            if Arc::ptr_eq(last, block) && *start + *len == slot {
                *len += 1;
                self.len += 1;
                return;
            }
        }
        self.entries
            .push_back(Entry::Run(Arc::clone(block), slot, 1));
        self.len += 1;
    }

    /// Drops the oldest dispatch.
    pub fn pop_front(&mut self) {
        match self.entries.front_mut() {
            Some(Entry::Run(_, start, len)) if *len > 1 => {
                *start += 1;
                *len -= 1;
            }
            Some(_) => {
                self.entries.pop_front();
            }
            None => return,
        }
        self.len -= 1;
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.len = 0;
    }

    /// The dispatches from the `skip`-th oldest on.
    pub fn iter_from(&self, mut skip: usize) -> impl Iterator<Item = &Arc<Dispatch>> {
        let mut first = 0;
        while first < self.entries.len() && skip >= self.entries[first].len() {
            skip -= self.entries[first].len();
            first += 1;
        }
        self.entries
            .range(first..)
            .enumerate()
            .flat_map(move |(i, entry)| {
                let skip = if i == 0 { skip } else { 0 };
                let (one, run) = match entry {
                    Entry::One(d) => (Some(d), None),
                    Entry::Run(block, start, len) => (
                        None,
                        Some((*start + skip as u8..*start + *len).map(|s| block.get(s))),
                    ),
                };
                // `skip` is 0 for a single entry: a whole entry is skipped
                // above.
                one.into_iter().chain(run.into_iter().flatten())
            })
    }

    /// Takes everything out, oldest first.
    pub fn take(&mut self) -> Vec<Arc<Dispatch>> {
        let all = self.iter_from(0).cloned().collect();
        self.clear();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_shared::protocol::Event;

    fn dispatch(i: usize) -> Arc<Dispatch> {
        Dispatch::from_body(Event::MessageCreate, i.to_string().as_bytes())
    }

    fn bodies<'a>(it: impl Iterator<Item = &'a Arc<Dispatch>>) -> Vec<String> {
        it.map(|d| String::from_utf8_lossy(d.body()).into_owned())
            .collect()
    }

    #[test]
    fn shared_and_own_dispatches_keep_their_order_across_blocks() {
        let mut log = Log::default();
        let mut ring = Ring::default();
        let mut expect = Vec::new();
        let mut own = 0;
        for i in 0..3 * BLOCK + 5 {
            if i % 7 == 3 {
                own += 1;
                // A dispatch for this session only, between channel events.
                ring.push(dispatch(10_000 + i));
                expect.push((10_000 + i).to_string());
            }
            let (block, slot) = log.append(dispatch(i));
            ring.push_shared(block, slot);
            expect.push(i.to_string());
        }
        assert_eq!(ring.len(), expect.len());
        assert_eq!(bodies(ring.iter_from(0)), expect);
        for skip in [1, 5, BLOCK, BLOCK + 1, expect.len() - 1, expect.len()] {
            assert_eq!(bodies(ring.iter_from(skip)), expect[skip..], "skip {skip}");
        }
        // Entries: the own dispatches, and one run per block between them
        // (not one per channel event).
        assert!(
            ring.entries.len() <= 2 * own + 4,
            "{} entries",
            ring.entries.len()
        );
    }

    #[test]
    fn popping_the_front_walks_into_runs() {
        let mut log = Log::default();
        let mut ring = Ring::default();
        for i in 0..BLOCK + 3 {
            let (block, slot) = log.append(dispatch(i));
            ring.push_shared(block, slot);
        }
        for i in 0..BLOCK + 1 {
            ring.pop_front();
            assert_eq!(ring.len(), BLOCK + 2 - i);
            assert_eq!(ring.iter_from(0).count(), ring.len());
            assert_eq!(
                bodies(ring.iter_from(0)).first(),
                Some(&(i + 1).to_string())
            );
        }
        assert_eq!(bodies(ring.iter_from(0)), ["33", "34"]);
        assert_eq!(bodies(ring.take().iter()), ["33", "34"]);
        assert!(ring.is_empty());
        ring.pop_front();
        assert_eq!(ring.len(), 0);
    }

    #[test]
    fn a_member_that_skipped_events_starts_a_new_run() {
        let mut log = Log::default();
        let mut a = Ring::default();
        let mut b = Ring::default();
        for i in 0..6 {
            let (block, slot) = log.append(dispatch(i));
            a.push_shared(block, slot);
            if i != 2 {
                b.push_shared(block, slot);
            }
        }
        assert_eq!(a.entries.len(), 1);
        assert_eq!(b.entries.len(), 2);
        assert_eq!(bodies(b.iter_from(0)), ["0", "1", "3", "4", "5"]);
    }
}
