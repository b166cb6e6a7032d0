// One IndexedDB object store per database, opened for one transaction at a time: where the
// dashboard keeps each session's key (dashboard.js) and the vault key lives on this device (vault.js).

function open(database, store, keyPath) {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(database, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(store, { keyPath });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

/**
 * Run `work(objectStore)` in one transaction on `store` of `database` (created with `keyPath` on
 * first use) and resolve with the result of the request it returns, once the transaction commits.
 */
export async function storeTx(database, store, keyPath, mode, work) {
  const db = await open(database, store, keyPath);
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(store, mode);
      const result = work(tx.objectStore(store));
      tx.oncomplete = () => resolve(result?.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}
