//! An in-process collective: ranks that are threads of one test process.
use std::sync::{Arc, Barrier, Mutex};
use trellis_comm::{Collective, Result as CommResult};

/// A shared-memory collective for ranks that are threads of one process.
pub struct Local {
    pub rank: usize,
    world: usize,
    slots: Arc<Mutex<Vec<Vec<f32>>>>,
    barrier: Arc<Barrier>,
}

impl Local {
    pub fn group(world: usize) -> Vec<Local> {
        let slots = Arc::new(Mutex::new(vec![Vec::new(); world]));
        let barrier = Arc::new(Barrier::new(world));
        (0..world)
            .map(|rank| Local {
                rank,
                world,
                slots: slots.clone(),
                barrier: barrier.clone(),
            })
            .collect()
    }
    fn exchange(&mut self, buf: &[f32]) -> Vec<Vec<f32>> {
        self.slots.lock().unwrap()[self.rank] = buf.to_vec();
        self.barrier.wait();
        let all = self.slots.lock().unwrap().clone();
        self.barrier.wait();
        all
    }
}

impl Collective for Local {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> CommResult<()> {
        let all = self.exchange(buf);
        for (i, x) in buf.iter_mut().enumerate() {
            *x = all.iter().map(|v| v[i]).sum();
        }
        Ok(())
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> CommResult<()> {
        let all = self.exchange(buf);
        buf.copy_from_slice(&all[root]);
        Ok(())
    }
    fn barrier(&mut self) -> CommResult<()> {
        self.barrier.wait();
        Ok(())
    }
    fn all_reduce_max_u64(&mut self, v: u64) -> CommResult<u64> {
        let all = self.exchange(&[v as f32]);
        Ok(all.iter().map(|x| x[0] as u64).max().unwrap())
    }
    fn all_reduce_min_u64(&mut self, v: u64) -> CommResult<u64> {
        let all = self.exchange(&[v as f32]);
        Ok(all.iter().map(|x| x[0] as u64).min().unwrap())
    }
}
